//! `--spawn`: a fresh `citycard serve` on a temporary data directory with fresh development
//! keys, listening on an ephemeral 127.0.0.1 port; and stopping it with SIGTERM (through
//! `kill`, since this crate forbids `unsafe`).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};

/// The `citycard` binary: `explicit`, else next to this executable.
pub fn server_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().context("locating the load tester's executable")?;
    let mut dir =
        exe.parent().ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
    // A test binary sits in the profile's deps/ folder; the server binary one folder up.
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    let candidate = dir.join("citycard");
    if !candidate.is_file() {
        build_server(dir);
    }
    if !candidate.is_file() {
        bail!(
            "no citycard binary at {} (build it with `cargo build --release -p citycard`, or pass --server-bin)",
            candidate.display()
        );
    }
    Ok(candidate)
}

/// A fresh clone that ran only `cargo run -p citycard-loadtest` has no server binary yet: build
/// it with the same profile into the same target directory (the workspace is known at compile
/// time), so `--spawn` works as the one command it is meant to be.
fn build_server(target_profile_dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let release = target_profile_dir.file_name().is_some_and(|n| n == "release");
    eprintln!(
        "citycard binary not built yet: running cargo build -p citycard{}",
        if release { " --release" } else { "" }
    );
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cargo.current_dir(&workspace).args(["build", "-p", "citycard"]);
    if release {
        cargo.arg("--release");
    }
    if let Some(target) = target_profile_dir.parent() {
        cargo.env("CARGO_TARGET_DIR", target);
    }
    match cargo.status() {
        Ok(status) if status.success() => {}
        Ok(status) => eprintln!("cargo build -p citycard failed ({status})"),
        Err(e) => eprintln!("could not run cargo: {e}"),
    }
}

fn run_quietly(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let output =
        command.stdin(Stdio::null()).output().with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Creates fresh development keys in `keys` with the citycard binary, the same certificates a
/// real deployment's `keys init` makes: the CA, the server's certificate, reader-1, kiosk-1 and
/// counter-1, plus `keys terminal` for reader-2.. and kiosk-2.. up to the counts asked for.
pub fn make_keys(bin: &Path, keys: &Path, readers: usize, kiosks: usize) -> anyhow::Result<()> {
    run_quietly(
        Command::new(bin).arg("keys").arg("init").arg("--dir").arg(keys),
        "citycard keys init",
    )?;
    for (role, count) in [("reader", readers), ("kiosk", kiosks)] {
        for i in 2..=count {
            run_quietly(
                Command::new(bin).args(["keys", "terminal", "--dir"]).arg(keys).args([
                    "--id",
                    &format!("{role}-{i}"),
                    "--role",
                    role,
                ]),
                "citycard keys terminal",
            )?;
        }
    }
    Ok(())
}

/// A running server started by the load tester. Dropping it kills the server.
pub struct Spawned {
    child: Option<Child>,
    pub addr: String,
    pub keys: PathBuf,
    pub pid: u32,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Spawned {
    /// Creates keys ([`make_keys`]), starts `serve`, and waits (30 s at most) for its
    /// `citycard listening on ADDR` line.
    pub fn start(
        bin: &Path,
        readers: usize,
        kiosks: usize,
        extra_args: &[String],
    ) -> anyhow::Result<Spawned> {
        let dir = tempfile::Builder::new()
            .prefix("citycard-loadtest-")
            .tempdir()
            .context("creating a temporary directory")?;
        let keys = dir.path().join("keys");
        let data = dir.path().join("data");
        make_keys(bin, &keys, readers, kiosks)?;
        let log = dir.path().join("server.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("serve")
            .arg("--keys")
            .arg(&keys)
            .arg("--data")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .with_context(|| format!("starting {} serve", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe to the server"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep reading to the end so the server never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("citycard listening on ") {
                    let _ = tx.send(addr.trim().to_owned());
                }
            }
        });
        let mut spawned =
            Spawned { child: Some(child), addr: String::new(), keys, pid, log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addr) => {
                    spawned.addr = addr;
                    return Ok(spawned);
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {}
            }
            if let Some(child) = spawned.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "the server exited ({status}) before listening; its log:\n{}",
                        spawned.log_tail(30)
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the server did not print its address within 30 s; its log:\n{}",
                    spawned.log_tail(30)
                );
            }
        }
    }

    /// The last `lines` lines of the server's stderr log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Lines of the server log at WARN or ERROR level (first `max`).
    pub fn log_problems(&self, max: usize) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR ") || l.contains("panicked"))
            .take(max)
            .map(str::to_owned)
            .collect()
    }

    /// SIGTERM, then wait up to `grace` for the drain; SIGKILL after that.
    pub fn stop(mut self, grace: Duration) -> anyhow::Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("already stopped".into());
        };
        if let Some(status) = child.try_wait()? {
            return Ok(format!("had already exited: {status}"));
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(format!("stopped with SIGTERM: {status}"));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                return Ok(format!("did not stop within {grace:?} of SIGTERM; killed: {status}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
