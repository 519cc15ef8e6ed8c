//! The `citycard` binary as an operator uses it: dev keys on first start, the admin listener,
//! SIGTERM, verify, configuration errors, and a second process on the same data directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_citycard");
/// Bound on waiting for the server to come up or go down.
const WAIT: Duration = Duration::from_secs(60);

fn serve(dir: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--shards", "2"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next().expect("server printed nothing").unwrap();
    let addr = line
        .strip_prefix("citycard listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line}"));
    (child, addr.to_owned())
}

fn admin_addr(child: &mut Child) -> String {
    // The admin address is in the log ("admin listener ... admin=ADDR"). A reader thread keeps
    // draining stderr so the server never blocks on a full pipe; the wait is bounded.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("admin=") {
                let rest = &line[i + 6..];
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                let _ = tx.send(rest[..end].to_owned());
            }
        }
    });
    rx.recv_timeout(WAIT).expect("admin address not logged")
}

fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
    (code, text)
}

fn sigterm_and_wait(mut child: Child) -> std::process::ExitStatus {
    let ok = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < WAIT, "server did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn first_start_generates_keys_serves_metrics_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _addr) = serve(dir.path(), &["--segment-bytes", "1048576"]);
    for file in ["ca.pem", "server.pem", "issuer.key", "assertion.pub", "terminals/counter-1.pem"] {
        assert!(dir.path().join("keys").join(file).exists(), "{file} not generated");
    }
    let admin = admin_addr(&mut child);
    assert_eq!(http_get(&admin, "/healthz").0, 200);
    assert_eq!(http_get(&admin, "/readyz").0, 200);
    let (code, metrics) = http_get(&admin, "/metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("citycard_build_info"), "{metrics}");
    assert!(metrics.contains("citycard_queue_depth{shard=\"1\"}"), "{metrics}");
    assert_eq!(http_get(&admin, "/nope").0, 404);

    // A second server on the same data directory is refused while the first runs.
    let second = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("in use"), "{second:?}");
    // And so is an audit.
    let audit = Command::new(BIN)
        .current_dir(dir.path())
        .args(["verify", "--data", "data"])
        .output()
        .unwrap();
    assert!(!audit.status.success());

    assert!(sigterm_and_wait(child).success(), "SIGTERM must exit 0");
    let audit = Command::new(BIN)
        .current_dir(dir.path())
        .args(["verify", "--data", "data"])
        .output()
        .unwrap();
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
    assert!(String::from_utf8_lossy(&audit.stdout).contains("verify: OK"));

    // The shard count of an existing data directory cannot change.
    let other = Command::new(BIN)
        .current_dir(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--shards", "3"])
        .output()
        .unwrap();
    assert!(!other.status.success());
    assert!(String::from_utf8_lossy(&other.stderr).contains("2 shards"), "{other:?}");
}

#[test]
fn configuration_layers_and_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("citycard.toml");
    std::fs::write(&file, "max_in_flight = 8\nqueue_depth = 100\n").unwrap();
    let shown = Command::new(BIN)
        .args(["config", "show", "--config", file.to_str().unwrap(), "--queue-depth", "200"])
        .env("CITYCARD_MAX_BATCH", "33")
        .output()
        .unwrap();
    assert!(shown.status.success(), "{shown:?}");
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(text.contains("max_in_flight = 8"), "file layer: {text}");
    assert!(text.contains("queue_depth = 200"), "flag beats file: {text}");
    assert!(text.contains("max_batch = 33"), "environment layer: {text}");

    for (contents, key) in [
        ("max_inflight = 3\n", "max_inflight"),
        ("queue_depth = 0\n", "queue_depth"),
        ("listen = 7\n", "listen"),
    ] {
        std::fs::write(&file, contents).unwrap();
        let out = Command::new(BIN)
            .current_dir(dir.path())
            .args(["serve", "--config", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{contents} accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(key), "error for {contents:?} does not name {key}: {stderr}");
    }
    // The example configuration shipped with the repository is valid.
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/citycard.example.toml");
    let out = Command::new(BIN).args(["config", "show", "--config", example]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn keys_init_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let first =
        Command::new(BIN).args(["keys", "init", "--dir", keys.to_str().unwrap()]).output().unwrap();
    assert!(first.status.success());
    let issuer = std::fs::read(keys.join("issuer.key")).unwrap();
    let second =
        Command::new(BIN).args(["keys", "init", "--dir", keys.to_str().unwrap()]).output().unwrap();
    assert!(!second.status.success());
    assert_eq!(std::fs::read(keys.join("issuer.key")).unwrap(), issuer);
    let terminal = Command::new(BIN)
        .args([
            "keys",
            "terminal",
            "--dir",
            keys.to_str().unwrap(),
            "--id",
            "gate-7",
            "--role",
            "reader",
        ])
        .output()
        .unwrap();
    assert!(terminal.status.success(), "{terminal:?}");
    assert!(keys.join("terminals/gate-7.pem").exists());
    let bad = Command::new(BIN)
        .args(["keys", "terminal", "--dir", keys.to_str().unwrap(), "--id", "x", "--role", "admin"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
