//! Disaster recovery against a real PostgreSQL pair (tests/common/pg.rs): the primary citycard
//! replicates every group commit to PostgreSQL, a standby citycard follows the DR site's hot
//! standby, and the tests kill, stop and promote:
//!
//! - failover: load through the real server over TLS; SIGKILL the primary citycard and the
//!   primary PostgreSQL at a seeded random moment; promote; every answer the load client got is
//!   at the DR site with the same bytes; the chains agree; the old primary, restarted, is fenced.
//! - the standby PostgreSQL stopped under load: the primary stops acknowledging (Unavailable,
//!   `/readyz` 503), then resumes by itself, and a retry gets the original decision.
//!
//! - holds across failover: a TapIn answered by the primary is a hold at the promoted site,
//!   which completes it with a TapOut, and settles an unanswered one at the missing tap-out fare
//!   when its timeout passes there.
//! - the link slowed (a delaying relay between citycard and PostgreSQL): slower answers within
//!   the stall bound, Unavailable past it, never an answer PostgreSQL does not have yet, and
//!   service back by itself; PostgreSQL silent while idle: the heartbeat notices, and the first
//!   request after is answered Unavailable instead of hanging.
//! - fail-back along the README runbook: A's PostgreSQL rebuilt as B's standby, a standby
//!   citycard at A, A promoted again (generation 3) with every answer of A and B, and both older
//!   directories fenced.
//!
//! `REPLICATION_SEED` picks the kill moment.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use citycard_protocol::{
    decode_response, Amount, EntryKind, MessageType, Request, RequestId, Response, Status,
    TransitResult,
};
use common::pg::PgPair;
use common::process::{body, http_get, sample, BIN};
use common::{Card, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bound on one answer: generous, a stalled shard answers within its stall bound.
const ANSWER_WAIT: Duration = Duration::from_secs(15);
const WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------
// A terminal that survives the server dying under it.

struct Terminal {
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: BytesMut,
    next: u32,
}

impl Terminal {
    async fn connect(keys: &Path, addr: SocketAddr, name: &str) -> Option<Terminal> {
        let config = citycard::tls::client_config(keys, name).ok()?;
        let stream = common::connect_with(addr, config).await.ok()?;
        Some(Terminal { stream, buf: BytesMut::new(), next: 1 })
    }

    /// One request and its answer; None when the server went away or did not answer in time.
    async fn call(&mut self, request: &Request) -> Option<Response> {
        let id = RequestId(self.next);
        self.next += 1;
        let mut out = BytesMut::new();
        request.encode(id, &mut out).ok()?;
        self.stream.write_all(&out).await.ok()?;
        self.stream.flush().await.ok()?;
        let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
        loop {
            if let Ok(Some((got, response))) = decode_response(&mut self.buf) {
                if got == id {
                    return Some(response);
                }
                continue;
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return None,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// citycard processes.

struct Proc {
    child: Child,
    addr: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(args: &[&str], wait_listening: bool) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (admin_tx, admin_rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("admin=") {
                    let rest = &line[i + 6..];
                    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                    let _ = admin_tx.send(rest[..end].to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("citycard listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut proc = Proc { child, addr: None, admin: None, log };
        if wait_listening {
            let addr = rx.recv_timeout(WAIT).unwrap_or_else(|_| {
                panic!("server did not start; log: {:#?}", proc.log.lock().unwrap())
            });
            proc.addr = Some(addr.parse().unwrap());
            proc.admin = admin_rx.recv_timeout(WAIT).ok().and_then(|a| a.parse().ok());
        }
        proc
    }

    fn addr(&self) -> SocketAddr {
        self.addr.unwrap()
    }

    fn log_has(&self, text: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(text))
    }

    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < WAIT,
                "process did not exit; log {:#?}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn term(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.wait_exit()
    }

    /// Waits (bounded) until `/readyz` answers 200.
    fn wait_ready(&self) {
        let admin = self.admin.expect("admin address");
        let started = Instant::now();
        loop {
            if http_get(admin, "/readyz").0 == 200 {
                return;
            }
            assert!(started.elapsed() < WAIT, "never ready; log {:#?}", self.log.lock().unwrap());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn write_config(dir: &Path, name: &str, conninfo: &str, stall_ms: u64) -> PathBuf {
    write_config_with(dir, name, conninfo, stall_ms, "")
}

/// A config file with top-level settings (`extra`, TOML lines) before `[replicate]`.
fn write_config_with(
    dir: &Path,
    name: &str,
    conninfo: &str,
    stall_ms: u64,
    extra: &str,
) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("{extra}[replicate]\nconninfo = \"{conninfo}\"\nstall_ms = {stall_ms}\n"),
    )
    .unwrap();
    path
}

/// `citycard serve` of `data` with `config` on ports the OS picks, then `extra` arguments.
fn spawn_serve(
    keys: &Path,
    data: &Path,
    config: &Path,
    extra: &[&str],
    wait_listening: bool,
) -> Proc {
    let mut args = vec![
        "serve",
        "--keys",
        keys.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--config",
        config.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    Proc::spawn(&args, wait_listening)
}

fn serve(keys: &Path, data: &Path, config: &Path) -> Proc {
    spawn_serve(keys, data, config, &["--shards", "2"], true)
}

fn promote_dir(pg: &PgPair, source: &common::pg::Pg, data: &Path) -> String {
    let promote = Command::new(BIN)
        .args(["promote", "--source", &pg.conninfo(source), "--data"])
        .arg(data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&promote.stdout).to_string();
    assert!(
        promote.status.success(),
        "promote: {said}{}",
        String::from_utf8_lossy(&promote.stderr)
    );
    said
}

fn standby_of(pg: &PgPair, source: &common::pg::Pg, data: &Path) -> Proc {
    standby_with(pg, source, data, &[])
}

/// [`standby_of`] with the key set: the standby keeps the derived state up while it follows,
/// every 100 records and at a clean stop.
fn standby_with_state(pg: &PgPair, source: &common::pg::Pg, data: &Path, keys: &Path) -> Proc {
    standby_with(
        pg,
        source,
        data,
        &["--keys", keys.to_str().unwrap(), "--state-every-records", "100"],
    )
}

fn standby_with(pg: &PgPair, source: &common::pg::Pg, data: &Path, extra: &[&str]) -> Proc {
    let conninfo = pg.conninfo(source);
    let mut args = vec!["standby", "--source", &conninfo, "--data", data.to_str().unwrap()];
    args.extend_from_slice(extra);
    Proc::spawn(&args, false)
}

/// The value of `key=` in a log line.
fn log_value(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A fenced data directory served with `config` says so and stops without serving.
fn assert_fenced(keys: &Path, data: &Path, config: &Path) {
    let mut old = spawn_serve(keys, data, config, &[], false);
    let status = old.wait_exit();
    assert!(!status.success());
    assert!(old.log_has("fenced"), "no fencing message: {:#?}", old.log.lock().unwrap());
}

/// `citycard verify` on a data directory: asserts it is clean and returns the chain heads.
fn verify_heads(data: &Path) -> Vec<(u16, u64, String)> {
    let out =
        Command::new(BIN).args(["verify", "--data", data.to_str().unwrap()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "verify {} failed:\n{text}", data.display());
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("shard ")?;
            let (shard, rest) = rest.split_once(": last seq ")?;
            let (seq, head) = rest.split_once(" head ")?;
            Some((shard.parse().ok()?, seq.parse().ok()?, head.to_owned()))
        })
        .collect()
}

async fn issue_cards(keys: &Path, addr: SocketAddr, n: usize, deposit: i64) -> Vec<Card> {
    let mut counter = common::Client::connect(keys, addr, "counter-1").await;
    let mut cards = Vec::new();
    for i in 0..n {
        cards.push(common::issue(&mut counter, 1_000 + i as u64, deposit).await);
    }
    counter.close().await;
    cards
}

/// Each driver buys with its own cards, one request at a time, until the server goes away or
/// `stop` is set; returns every (request, answer) it got.
async fn drive(
    keys: PathBuf,
    addr: SocketAddr,
    mut cards: Vec<Card>,
    seed: u64,
    answered: Arc<std::sync::atomic::AtomicUsize>,
    limit: usize,
) -> Vec<(Request, Response)> {
    let mut got = Vec::new();
    let Some(mut terminal) = Terminal::connect(&keys, addr, "reader-1").await else { return got };
    let mut rng = Rng(seed);
    while answered.load(std::sync::atomic::Ordering::Relaxed) < limit {
        let i = rng.below(cards.len() as u64) as usize;
        let request = cards[i].purchase(1 + rng.below(40) as i64, "reader-1");
        match terminal.call(&request).await {
            Some(response) => {
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                got.push((request, response));
            }
            None => break,
        }
    }
    got
}

#[test]
fn failover_keeps_every_answer_and_fences_the_old_primary() {
    let seed: u64 =
        std::env::var("REPLICATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(14);
    let pg = PgPair::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let (primary_data, standby_data) = (dir.path().join("primary"), dir.path().join("standby"));
    let primary_config = write_config(dir.path(), "primary.toml", &pg.conninfo(&pg.primary), 5_000);

    let mut primary = serve(&keys, &primary_data, &primary_config);
    primary.wait_ready();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let cards = runtime.block_on(issue_cards(&keys, primary.addr(), 16, 100_000));
    let mut standby = standby_with_state(&pg, &pg.standby, &standby_data, &keys);

    // Load from four terminals; SIGKILL the primary citycard and crash the primary PostgreSQL
    // after a seeded random number of answers, while requests are in flight.
    let kill_after = 150 + Rng(seed).below(250) as usize;
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut drivers = Vec::new();
    for (d, chunk) in cards.chunks(4).enumerate() {
        drivers.push(runtime.spawn(drive(
            keys.clone(),
            primary.addr(),
            chunk.to_vec(),
            seed * 31 + d as u64,
            answered.clone(),
            usize::MAX,
        )));
    }
    let started = Instant::now();
    while answered.load(std::sync::atomic::Ordering::Relaxed) < kill_after {
        assert!(
            started.elapsed() < WAIT,
            "load made no progress: {:#?}",
            primary.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    pg.stop_server(&pg.primary, "immediate");
    let mut answers: Vec<(Request, Response)> = Vec::new();
    for d in drivers {
        answers.extend(runtime.block_on(d).unwrap());
    }
    assert!(answers.len() >= kill_after, "{} answers", answers.len());
    assert!(
        answers
            .iter()
            .all(|(_, r)| matches!(r, Response::Purchase(c) if c.status == Status::Approved)),
        "with PostgreSQL healthy every purchase is approved"
    );

    // Fail over: stop the standby citycard, promote PostgreSQL, then the standby.
    assert!(standby.term().success(), "standby failed: {:#?}", standby.log.lock().unwrap());
    pg.promote_standby();
    let promoted = promote_dir(&pg, &pg.standby, &standby_data);
    assert!(promoted.contains("generation 2"), "{promoted}");

    // The chains: the DR site's journal is the primary's up to where PostgreSQL got.
    let primary_heads = verify_heads(&primary_data);
    let dr_heads = verify_heads(&standby_data);
    assert_eq!(primary_heads.len(), 2);
    assert_eq!(dr_heads.len(), 2);
    for ((shard, seq, head), (_, primary_seq, primary_head)) in dr_heads.iter().zip(&primary_heads)
    {
        assert!(seq <= primary_seq, "shard {shard}: DR ahead of the primary");
        let journal = primary_data.join(format!("shard-{shard}/journal"));
        let archive = primary_data.join(format!("shard-{shard}/archive"));
        let hash = citycard::replicate::standby::chain_head(&journal, &archive, *seq).unwrap();
        assert_eq!(&citycard::hex::encode(&hash), head, "shard {shard} seq {seq}: chains differ");
        if seq == primary_seq {
            assert_eq!(head, primary_head);
        }
    }

    // Every answer the terminals got is at the DR site: the same bytes retried there get the
    // very same answer (status, balance, journal_seq and MAC).
    let dr_config = write_config(dir.path(), "dr.toml", &pg.conninfo(&pg.standby), 5_000);
    let dr = serve(&keys, &standby_data, &dr_config);
    dr.wait_ready();
    // The standby kept the derived state up while it followed (and built it at its clean
    // stop): the promoted site replays only what `promote` appended after that, from a
    // checkpoint, and rebuilds nothing.
    let builds = standby
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("state up to the journal"))
        .count();
    assert!(builds >= 2, "a build every 100 records and one at the stop: {builds}");
    let recovered: Vec<String> =
        dr.log.lock().unwrap().iter().filter(|l| l.contains("shard recovered")).cloned().collect();
    assert_eq!(recovered.len(), 2, "{recovered:#?}");
    for line in &recovered {
        assert!(line.contains("rebuilt_state=false"), "{line}");
        let (replayed, last_seq) = (log_value(line, "replayed"), log_value(line, "last_seq"));
        let from = log_value(line, "from_checkpoint");
        assert!(from.is_some_and(|f| f > 0) && replayed < last_seq, "{line}");
    }
    runtime.block_on(async {
        let mut terminal = Terminal::connect(&keys, dr.addr(), "reader-1").await.unwrap();
        for (request, answer) in &answers {
            let again = terminal.call(request).await.expect("DR answers");
            assert_eq!(&again, answer, "an answer the terminal got is not at the DR site");
        }
    });

    // The old primary, restarted against the promoted database, is fenced: it says why and
    // stops without serving.
    assert_fenced(&keys, &primary_data, &dr_config);
}

#[test]
fn standby_postgres_stopped_stops_acknowledging_then_resumes() {
    let pg = PgPair::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let data = dir.path().join("primary");
    let config = write_config(dir.path(), "primary.toml", &pg.conninfo(&pg.primary), 1_000);
    let primary = serve(&keys, &data, &config);
    primary.wait_ready();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut cards = runtime.block_on(issue_cards(&keys, primary.addr(), 2, 1_000));
    let admin = primary.admin.unwrap();

    runtime.block_on(async {
        let mut terminal = Terminal::connect(&keys, primary.addr(), "reader-1").await.unwrap();
        let first = cards[0].purchase(100, "reader-1");
        let Some(Response::Purchase(r)) = terminal.call(&first).await else { panic!("no answer") };
        assert_eq!((r.status, r.balance.0), (Status::Approved, 900));

        // The synchronous standby goes away: commits in PostgreSQL wait, so nothing is
        // acknowledged; past the stall bound the answer is Unavailable.
        pg.stop_server(&pg.standby, "fast");
        let held = cards[0].purchase(50, "reader-1");
        let Some(Response::Purchase(r)) = terminal.call(&held).await else { panic!("no answer") };
        assert_eq!(r.status, Status::Unavailable, "{r:?}");
        assert_eq!((r.balance.0, r.journal_seq), (0, 0));
        let (code, text) = http_get(admin, "/readyz");
        assert_eq!(code, 503, "{text}");
        assert!(body(&text).contains("replication"), "{text}");
        let (_, metrics) = http_get(admin, "/metrics");
        let lag = sample(body(&metrics), "citycard_replication_lag_records{shard=\"0\"}")
            .unwrap_or(0.0)
            + sample(body(&metrics), "citycard_replication_lag_records{shard=\"1\"}")
                .unwrap_or(0.0);
        assert!(lag >= 1.0, "lag not shown:\n{metrics}");
        // The replicated server's page passes promtool, and names what deploy/ uses.
        let page = body(&metrics).to_owned();
        let promtool = common::process::promtool();
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut check.stdin.take().unwrap(), page.as_bytes()).unwrap();
        let out = check.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && said.trim().is_empty(), "promtool: {said}\n{page}");
        for name in [
            "citycard_replication_lag_records",
            "citycard_replication_refusing",
            "citycard_replication_failures_total",
            "citycard_replication_last_commit_seconds",
        ] {
            assert!(page.contains(name), "{name} missing:\n{page}");
        }
        // While stalled, new card work is refused without being decided.
        let refused = cards[1].purchase(10, "reader-1");
        let Some(Response::Purchase(r)) = terminal.call(&refused).await else {
            panic!("no answer")
        };
        assert_eq!(r.status, Status::Unavailable);

        // PostgreSQL's standby returns: service resumes by itself.
        pg.start_server(&pg.standby);
        let started = Instant::now();
        while http_get(admin, "/readyz").0 != 200 {
            assert!(started.elapsed() < WAIT, "never resumed: {:#?}", primary.log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The held purchase was decided before the stall; its retry gets that decision, once.
        let Some(Response::Purchase(r)) = terminal.call(&held).await else { panic!("no answer") };
        assert_eq!((r.status, r.balance.0), (Status::Approved, 850), "{r:?}");
        let Some(Response::Purchase(again)) = terminal.call(&held).await else {
            panic!("no answer")
        };
        assert_eq!(again, r, "a second retry must get the same answer");
        // The refused one was never decided: its retry is decided now.
        let Some(Response::Purchase(r)) = terminal.call(&refused).await else {
            panic!("no answer")
        };
        assert_eq!((r.status, r.balance.0), (Status::Approved, 990), "{r:?}");
    });
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(
        sample(body(&metrics), "citycard_replication_lag_records{shard=\"0\"}") == Some(0.0),
        "{metrics}"
    );
}

fn transit(response: Option<Response>) -> TransitResult {
    match response {
        Some(Response::TapIn(t) | Response::TapOut(t) | Response::Funds(t)) => t,
        other => panic!("not a transit answer: {other:?}"),
    }
}

/// Funds for a card, at an ATC above every one used (Funds consumes none).
fn funds(card: &Card) -> Request {
    Request::Funds { auth: card.auth_at(MessageType::Funds, 0, "reader-1", card.atc + 1) }
}

async fn history(terminal: &mut Terminal, card: &Card) -> Vec<citycard_protocol::HistoryEntry> {
    let auth = card.auth_at(MessageType::History, 0, "kiosk-1", card.atc + 1);
    match terminal.call(&Request::History { auth, before_seq: 0, limit: 64 }).await {
        Some(Response::History(page)) => page.entries,
        other => panic!("no history: {other:?}"),
    }
}

#[test]
fn holds_survive_failover_and_settle_at_the_promoted_site() {
    const MAX_FARE: i64 = 400;
    /// The unanswered rider's hold timeout: long enough to be open when its tap-in is
    /// answered, short enough to pass while the test waits at the promoted site.
    const SHORT_TIMEOUT: &str = "hold_timeout_ms = 15000\nmissing_tapout_fare = 250\n";
    let pg = PgPair::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let (primary_data, standby_data) = (dir.path().join("primary"), dir.path().join("standby"));
    let primary_config = write_config(dir.path(), "primary.toml", &pg.conninfo(&pg.primary), 5_000);
    let mut primary = serve(&keys, &primary_data, &primary_config);
    primary.wait_ready();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut cards = runtime.block_on(issue_cards(&keys, primary.addr(), 2, 1_000));
    let mut standby = standby_of(&pg, &pg.standby, &standby_data);
    let tap_in = |terminal: &mut Terminal, request: &Request| -> (Response, TransitResult) {
        let answer = runtime.block_on(terminal.call(request));
        let t = transit(answer.clone());
        assert_eq!(
            (t.status, t.balance, t.held),
            (Status::Approved, Amount(1_000), Amount(MAX_FARE))
        );
        (answer.unwrap(), t)
    };

    // One rider taps in under the default 3 h timeout and will tap out at the DR site.
    let ride_in = Request::TapIn { auth: cards[0].auth(MessageType::TapIn, 0, "reader-1") };
    let mut gate = runtime.block_on(Terminal::connect(&keys, primary.addr(), "reader-1")).unwrap();
    let (ride, ride_t) = tap_in(&mut gate, &ride_in);
    // The other taps in under a short timeout (the timeout is fixed at tap-in) and never taps
    // out.
    assert!(primary.term().success());
    let short_config = write_config_with(
        dir.path(),
        "primary-short.toml",
        &pg.conninfo(&pg.primary),
        5_000,
        SHORT_TIMEOUT,
    );
    let mut primary = serve(&keys, &primary_data, &short_config);
    primary.wait_ready();
    let gone_in = Request::TapIn { auth: cards[1].auth(MessageType::TapIn, 0, "reader-1") };
    let mut gate = runtime.block_on(Terminal::connect(&keys, primary.addr(), "reader-1")).unwrap();
    let (gone, gone_t) = tap_in(&mut gate, &gone_in);

    // Site A is lost right after answering: SIGKILL citycard, crash PostgreSQL; fail over.
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    pg.stop_server(&pg.primary, "immediate");
    assert!(standby.term().success(), "standby failed: {:#?}", standby.log.lock().unwrap());
    pg.promote_standby();
    promote_dir(&pg, &pg.standby, &standby_data);
    let dr_config =
        write_config_with(dir.path(), "dr.toml", &pg.conninfo(&pg.standby), 5_000, SHORT_TIMEOUT);
    let mut dr = serve(&keys, &standby_data, &dr_config);
    dr.wait_ready();

    runtime.block_on(async {
        let mut gate = Terminal::connect(&keys, dr.addr(), "reader-1").await.unwrap();
        // The tap-ins are there: their retries get the primary's answers byte for byte.
        assert_eq!(gate.call(&ride_in).await.as_ref(), Some(&ride), "tap-in retried at DR");
        assert_eq!(gate.call(&gone_in).await.as_ref(), Some(&gone), "tap-in retried at DR");
        // The rider's hold is open at B as A placed it, and B completes it with the tap-out.
        let f = transit(gate.call(&funds(&cards[0])).await);
        assert_eq!(
            (f.status, f.balance, f.held, f.ref_atc, f.time_ms),
            (Status::Approved, Amount(1_000), Amount(MAX_FARE), ride_t.atc, ride_t.time_ms),
            "the hold did not survive failover"
        );
        let out = Request::TapOut {
            auth: cards[0].auth(MessageType::TapOut, 120, "reader-1"),
            fare: Amount(120),
        };
        let t = transit(gate.call(&out).await);
        assert_eq!(
            (t.status, t.balance, t.held, t.ref_atc),
            (Status::Approved, Amount(880), Amount(0), ride_t.atc)
        );
        assert_eq!(transit(gate.call(&out).await), t, "a retried tap-out is the same answer");

        // The unanswered hold: still open with A's expiry, or (a slow failover) already
        // settled by B; either way B settles it once, at the missing tap-out fare.
        let f = transit(gate.call(&funds(&cards[1])).await);
        if f.held == Amount(MAX_FARE) {
            assert_eq!(
                (f.balance, f.ref_atc, f.time_ms),
                (Amount(1_000), gone_t.atc, gone_t.time_ms)
            );
            // No traffic until well past the expiry (time_ms): the worker's idle sweep, not a
            // request, settles it.
            let idle_ms = (f.time_ms + 2_000).saturating_sub(citycard::now_ms()).min(20_000);
            tokio::time::sleep(Duration::from_millis(idle_ms)).await;
        } else {
            assert_eq!((f.balance, f.held), (Amount(750), Amount(0)), "{f:?}");
        }
        let mut kiosk = Terminal::connect(&keys, dr.addr(), "kiosk-1").await.unwrap();
        let mut settled = None;
        for _ in 0..600 {
            let entries = history(&mut kiosk, &cards[1]).await;
            if entries.first().map(|e| e.kind) == Some(EntryKind::HoldExpired) {
                settled = Some(entries);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let settled = settled.expect("the hold was not settled at the promoted site within 60 s");
        let expired = &settled[0];
        assert_eq!(
            (expired.status, expired.amount, expired.balance_after),
            (Status::Approved, Amount(-250), Amount(750))
        );
        assert_eq!(settled.iter().filter(|e| e.kind == EntryKind::HoldExpired).count(), 1);
        let ride_history = history(&mut kiosk, &cards[0]).await;
        assert!(
            ride_history.iter().all(|e| e.kind != EntryKind::HoldExpired),
            "a completed ride was settled again: {ride_history:?}"
        );
        let f = transit(gate.call(&funds(&cards[1])).await);
        assert_eq!((f.balance, f.held), (Amount(750), Amount(0)));
        // The late tap-out of the settled ride finds no hold.
        let late = Request::TapOut {
            auth: cards[1].auth(MessageType::TapOut, 100, "reader-1"),
            fare: Amount(100),
        };
        let late = transit(gate.call(&late).await);
        assert_eq!((late.status, late.balance), (Status::NoOpenHold, Amount(750)));
    });
    assert!(dr.term().success(), "DR stop: {:#?}", dr.log.lock().unwrap());
    // The settlement is in the promoted site's journal, and in PostgreSQL: every record the
    // promoted site journaled, the idle sweep's included, reached its database.
    let heads = verify_heads(&standby_data);
    assert_eq!(heads.len(), 2);
    let in_pg = pg.psql(
        pg.standby.port,
        "citycard",
        "SELECT string_agg(shard || ':' || last_seq, ',' ORDER BY shard) FROM citycard_shard",
    );
    let local: Vec<String> = heads.iter().map(|(shard, seq, _)| format!("{shard}:{seq}")).collect();
    assert_eq!(in_pg, local.join(","), "PostgreSQL lacks records the promoted site journaled");
}

// ---------------------------------------------------------------------------------------------
// A link between citycard and PostgreSQL that the test can slow down or silence.

/// A TCP relay on 127.0.0.1 to PostgreSQL: every chunk waits `delay_ms` in each direction, and
/// while `silent` nothing is passed on (PostgreSQL seems to stop answering, the connection stays
/// open). Lives as long as its runtime.
struct Link {
    port: u16,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    silent: Arc<std::sync::atomic::AtomicBool>,
}

/// Longest a relay holds a chunk back while silent (a test never needs more).
const SILENT_MAX: Duration = Duration::from_secs(120);

impl Link {
    async fn start(upstream: u16) -> Link {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let silent = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (d, s) = (delay_ms.clone(), silent.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                tokio::spawn(relay(in_read, out_write, d.clone(), s.clone()));
                tokio::spawn(relay(out_read, in_write, d.clone(), s.clone()));
            }
        });
        Link { port, delay_ms, silent }
    }

    fn conninfo(&self) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=citycard", self.port)
    }

    fn delay(&self, ms: u64) {
        self.delay_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    fn silence(&self, on: bool) {
        self.silent.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<std::sync::atomic::AtomicU64>,
    silent: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let held = Instant::now();
        while silent.load(std::sync::atomic::Ordering::SeqCst) && held.elapsed() < SILENT_MAX {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delay = delay_ms.load(std::sync::atomic::Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// PostgreSQL's head seq of one shard, asked directly (not through the link).
fn pg_head(pg: &PgPair, port: u16, shard: u16) -> u64 {
    pg.psql(port, "citycard", &format!("SELECT last_seq FROM citycard_shard WHERE shard = {shard}"))
        .parse()
        .unwrap()
}

fn wait_readyz(admin: SocketAddr, code: u16, proc: &Proc) {
    let started = Instant::now();
    while http_get(admin, "/readyz").0 != code {
        assert!(
            started.elapsed() < WAIT,
            "/readyz never answered {code}: {:#?}",
            proc.log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_slow_or_silent_link_never_acknowledges_unreplicated_and_recovers() {
    let pg = PgPair::start();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let link = runtime.block_on(Link::start(pg.primary.port));
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let data = dir.path().join("primary");
    let config = write_config(dir.path(), "primary.toml", &link.conninfo(), 1_000);
    let primary = serve(&keys, &data, &config);
    primary.wait_ready();
    let admin = primary.admin.unwrap();
    let mut cards = runtime.block_on(issue_cards(&keys, primary.addr(), 2, 10_000));
    let shard = citycard::engine::shard_of(cards[0].id, 2);
    let mut terminal =
        runtime.block_on(Terminal::connect(&keys, primary.addr(), "reader-1")).unwrap();
    let buy = |terminal: &mut Terminal, request: &Request| -> citycard_protocol::CardResult {
        match runtime.block_on(terminal.call(request)) {
            Some(Response::Purchase(r)) => r,
            other => panic!("no purchase answer: {other:?}"),
        }
    };
    let mut balance = 10_000;

    // Slowed within the stall bound (50 ms each way, every chunk): answers are slower but
    // approved, and each approved answer's record is already in PostgreSQL when it arrives.
    link.delay(50);
    for amount in 1..=5 {
        let r = buy(&mut terminal, &cards[0].purchase(amount, "reader-1"));
        balance -= amount;
        assert_eq!((r.status, r.balance.0), (Status::Approved, balance));
        assert!(pg_head(&pg, pg.primary.port, shard) >= r.journal_seq, "acknowledged unreplicated");
    }

    // Slowed past the bound (1.5 s each way): the answer is Unavailable, nothing acknowledged;
    // /readyz says so; when the link is fast again the shard resumes by itself, and the retry
    // of the same bytes gets the decision taken before, once.
    link.delay(1_500);
    let held = cards[0].purchase(100, "reader-1");
    let r = buy(&mut terminal, &held);
    assert_eq!((r.status, r.balance.0, r.journal_seq), (Status::Unavailable, 0, 0));
    wait_readyz(admin, 503, &primary);
    link.delay(0);
    wait_readyz(admin, 200, &primary);
    let r = buy(&mut terminal, &held);
    balance -= 100;
    assert_eq!((r.status, r.balance.0), (Status::Approved, balance), "{r:?}");
    assert!(pg_head(&pg, pg.primary.port, shard) >= r.journal_seq);
    assert_eq!(buy(&mut terminal, &held), r, "a second retry must get the same answer");

    // PostgreSQL goes silent while no card is presented: the idle heartbeat finds out, /readyz
    // turns 503 with no traffic at all, and the first request after is answered Unavailable
    // (undecided) instead of hanging.
    link.silence(true);
    wait_readyz(admin, 503, &primary);
    let silent = cards[1].purchase(10, "reader-1");
    let r = buy(&mut terminal, &silent);
    assert_eq!((r.status, r.journal_seq), (Status::Unavailable, 0));
    link.silence(false);
    wait_readyz(admin, 200, &primary);
    let r = buy(&mut terminal, &silent);
    assert_eq!((r.status, r.balance.0), (Status::Approved, 9_990), "{r:?}");
    let other = citycard::engine::shard_of(cards[1].id, 2);
    assert!(pg_head(&pg, pg.primary.port, other) >= r.journal_seq);
    assert!(primary.log_has("replication caught up; serving again"));
}

/// Buys once with every card at `addr`; returns each (request, answer), all approved.
fn buy_each(
    runtime: &tokio::runtime::Runtime,
    keys: &Path,
    addr: SocketAddr,
    cards: &mut [Card],
    amount: i64,
) -> Vec<(Request, Response)> {
    runtime.block_on(async {
        let mut terminal = Terminal::connect(keys, addr, "reader-1").await.unwrap();
        let mut got = Vec::new();
        for card in cards.iter_mut() {
            let request = card.purchase(amount, "reader-1");
            let answer = terminal.call(&request).await.expect("an answer");
            assert!(matches!(&answer, Response::Purchase(r) if r.status == Status::Approved));
            got.push((request, answer));
        }
        got
    })
}

#[test]
fn fail_back_follows_the_runbook() {
    let pg = PgPair::start();
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    citycard::keys::init(&keys).unwrap();
    let (a_old, b_data, a_new) =
        (dir.path().join("a"), dir.path().join("b"), dir.path().join("a-again"));
    let a_config = write_config(dir.path(), "a.toml", &pg.conninfo(&pg.primary), 5_000);
    let b_config = write_config(dir.path(), "b.toml", &pg.conninfo(&pg.standby), 5_000);
    let runtime = tokio::runtime::Runtime::new().unwrap();

    // Steps 1 to 3: A serves, B follows.
    let mut a = serve(&keys, &a_old, &a_config);
    a.wait_ready();
    let mut cards = runtime.block_on(issue_cards(&keys, a.addr(), 4, 10_000));
    let mut b_standby = standby_of(&pg, &pg.standby, &b_data);
    let mut answers = buy_each(&runtime, &keys, a.addr(), &mut cards, 10);

    // Step 4, fail over: A is lost; B's PostgreSQL and citycard are promoted; B serves.
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    pg.stop_server(&pg.primary, "immediate");
    assert!(b_standby.term().success());
    pg.promote_standby();
    assert!(promote_dir(&pg, &pg.standby, &b_data).contains("generation 2"));
    let mut b = serve(&keys, &b_data, &b_config);
    b.wait_ready();
    answers.extend(buy_each(&runtime, &keys, b.addr(), &mut cards, 20));

    // Step 5, fail back: A's old directory is set aside (fenced); A's PostgreSQL is rebuilt as
    // B's synchronous standby; a standby citycard at A follows into an empty directory while B
    // keeps serving.
    pg.rebuild_standby_of(&pg.primary, &pg.standby);
    let mut a_standby = standby_of(&pg, &pg.primary, &a_new);
    answers.extend(buy_each(&runtime, &keys, b.addr(), &mut cards, 30));
    // In a quiet moment: B stops, A's PostgreSQL and citycard are promoted, A serves again.
    assert!(b.term().success(), "B stop: {:#?}", b.log.lock().unwrap());
    assert!(a_standby.term().success(), "A standby: {:#?}", a_standby.log.lock().unwrap());
    pg.promote(&pg.primary);
    assert!(promote_dir(&pg, &pg.primary, &a_new).contains("generation 3"));
    let b_heads = verify_heads(&b_data);
    assert_eq!(verify_heads(&a_new), b_heads, "A took in everything B journaled");
    let a = serve(&keys, &a_new, &a_config);
    a.wait_ready();

    // Every answer given at A before the failover and at B after it is at A now.
    runtime.block_on(async {
        let mut terminal = Terminal::connect(&keys, a.addr(), "reader-1").await.unwrap();
        for (request, answer) in &answers {
            let again = terminal.call(request).await.expect("A answers");
            assert_eq!(&again, answer, "an answer is missing after fail-back");
        }
    });
    let after = buy_each(&runtime, &keys, a.addr(), &mut cards, 40);
    assert!(after
        .iter()
        .all(|(_, r)| matches!(r, Response::Purchase(p) if p.balance.0 == 10_000 - 100)));
    // Both older directories are fenced by generation 3.
    assert_fenced(&keys, &b_data, &a_config);
    assert_fenced(&keys, &a_old, &a_config);
}
