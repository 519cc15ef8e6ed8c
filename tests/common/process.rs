//! The `citycard` binary as a child process for black-box tests: spawn with an ephemeral
//! terminal and admin port, read both addresses, scrape the admin listener, signal, stop.
//! Also installs promtool (Debian's `prometheus` package) when a test needs it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_citycard");
/// Bound on waiting for the server to come up or go down, and for one log line.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Server {
    pub child: Child,
    /// Terminal listener.
    pub addr: SocketAddr,
    /// Admin listener, to connect to (an unspecified bind address is reached via 127.0.0.1).
    pub admin: SocketAddr,
    /// Every stderr line so far (the log), drained by a thread so the child never blocks.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// Starts `citycard serve` in `dir` with `--listen 127.0.0.1:0 --shards 2` and `extra`
/// (which should hold `--admin`).
pub fn spawn(dir: &Path, extra: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .current_dir(dir)
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "2"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("admin=") {
                let rest = &line[i + 6..];
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                let _ = tx.send(rest[..end].to_owned());
            }
            sink.lock().unwrap().push(line);
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = match lines.next() {
        Some(Ok(line)) => line,
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server printed nothing; log: {:?}", log.lock().unwrap());
        }
    };
    let addr = line
        .strip_prefix("citycard listening on ")
        .unwrap_or_else(|| panic!("unexpected line {line}"))
        .parse()
        .unwrap();
    let admin: SocketAddr =
        rx.recv_timeout(WAIT).expect("admin address not logged").parse().unwrap();
    let admin = if admin.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], admin.port()))
    } else {
        admin
    };
    Server { child, addr, admin, log }
}

impl Server {
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{signal} failed");
    }

    /// Waits (bounded) until a log line contains `text`.
    pub fn wait_for_log(&self, text: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            assert!(started.elapsed() < WAIT, "no log line with {text:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < WAIT, "server did not stop after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    /// A failing test must not leave its server running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One plain-HTTP GET: (status code, whole response).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
    (code, text)
}

/// The body of a response from [`http_get`].
pub fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// The value of the first sample line of `/metrics` text that starts with `series` (name and
/// labels exactly as rendered).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// How long apt may take for one step (update, install) before the test gives up.
const APT_TIMEOUT_SECS: &str = "900";

/// The promtool binary: on PATH, or installed from Debian's `prometheus` package (as root,
/// bounded by a timeout). Installs at most once per test process.
pub fn promtool() -> PathBuf {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let found = || {
        Command::new("promtool")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
            .then(|| PathBuf::from("promtool"))
    };
    if let Some(path) = found() {
        return path;
    }
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "promtool is missing and installing it needs root: apt-get install prometheus"
    );
    for args in [
        vec!["apt-get", "update", "-q"],
        vec![
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "DPkg::Lock::Timeout=300",
            "prometheus",
        ],
    ] {
        let out = Command::new("timeout")
            .arg(APT_TIMEOUT_SECS)
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    found().expect("promtool still missing after installing the prometheus package")
}
