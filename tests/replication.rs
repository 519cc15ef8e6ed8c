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
use citycard_protocol::{decode_response, Request, RequestId, Response, Status};
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
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!("[replicate]\nconninfo = \"{conninfo}\"\nstall_ms = {stall_ms}\n"),
    )
    .unwrap();
    path
}

fn serve(keys: &Path, data: &Path, config: &Path) -> Proc {
    Proc::spawn(
        &[
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
            "--shards",
            "2",
        ],
        true,
    )
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
    let mut standby = Proc::spawn(
        &[
            "standby",
            "--source",
            &pg.conninfo(&pg.standby),
            "--data",
            standby_data.to_str().unwrap(),
        ],
        false,
    );

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
    let promote = Command::new(BIN)
        .args(["promote", "--source", &pg.conninfo(&pg.standby), "--data"])
        .arg(&standby_data)
        .output()
        .unwrap();
    let promoted = String::from_utf8_lossy(&promote.stdout).to_string();
    assert!(
        promote.status.success(),
        "promote failed: {promoted}{}",
        String::from_utf8_lossy(&promote.stderr)
    );
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
    runtime.block_on(async {
        let mut terminal = Terminal::connect(&keys, dr.addr(), "reader-1").await.unwrap();
        for (request, answer) in &answers {
            let again = terminal.call(request).await.expect("DR answers");
            assert_eq!(&again, answer, "an answer the terminal got is not at the DR site");
        }
    });

    // The old primary, restarted against the promoted database, is fenced: it says why and
    // stops without serving.
    let mut old = Proc::spawn(
        &[
            "serve",
            "--keys",
            keys.to_str().unwrap(),
            "--data",
            primary_data.to_str().unwrap(),
            "--config",
            dr_config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        false,
    );
    let status = old.wait_exit();
    assert!(!status.success());
    assert!(old.log_has("fenced"), "no fencing message: {:#?}", old.log.lock().unwrap());
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
