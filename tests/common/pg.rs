//! A real PostgreSQL pair for the disaster-recovery tests: a primary with
//! `synchronous_standby_names = 'dr'` and a streaming hot standby made with pg_basebackup, both
//! on loopback ports in a temporary directory, run as the `postgres` user when the tests run as
//! root. Dropping the pair stops both servers. PostgreSQL is installed with apt when missing
//! (as root), as `.ci/run` does.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// One PostgreSQL server of the pair.
pub struct Pg {
    pub dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

pub struct PgPair {
    pub base: tempfile::TempDir,
    pub bin: PathBuf,
    pub primary: Pg,
    pub standby: Pg,
    as_postgres: bool,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn find_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

/// The PostgreSQL binaries, installing Debian's `postgresql` package as root when missing.
pub fn bin() -> PathBuf {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(bin) = find_bin() {
        return bin;
    }
    assert!(
        is_root(),
        "PostgreSQL is not installed and installing it needs root: apt-get install postgresql"
    );
    for args in [
        vec!["apt-get", "update", "-q"],
        vec!["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "postgresql"],
    ] {
        let out = Command::new("timeout")
            .arg("900")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    find_bin().expect("PostgreSQL still missing after apt-get install postgresql")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PgPair {
    /// initdb, start the primary, create the `citycard` database, pg_basebackup the standby,
    /// start it, and wait until it streams synchronously.
    pub fn start() -> PgPair {
        let bin = bin();
        let as_postgres = is_root();
        let base = tempfile::Builder::new().prefix("citycard-pg").tempdir().unwrap();
        let sock = base.path().join("sock");
        std::fs::create_dir_all(&sock).unwrap();
        if as_postgres {
            let ok =
                Command::new("chown").args(["-R", "postgres"]).arg(base.path()).status().unwrap();
            assert!(ok.success());
        }
        let primary = Pg {
            dir: base.path().join("primary"),
            port: free_port(),
            log: base.path().join("primary.log"),
        };
        let standby = Pg {
            dir: base.path().join("standby"),
            port: free_port(),
            log: base.path().join("standby.log"),
        };
        let pair = PgPair { base, bin, primary, standby, as_postgres };
        pair.run(
            "initdb",
            &[
                "-D",
                path(&pair.primary.dir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 4\nhot_standby = on\n\
             synchronous_commit = on\nfsync = on\n\
             shared_buffers = 64MB\nmax_connections = 40\nwal_receiver_status_interval = 1s\n",
            pair.primary.port,
            sock.display()
        );
        pair.append(&pair.primary.dir.join("postgresql.conf"), &conf);
        pair.start_server(&pair.primary);
        pair.psql(pair.primary.port, "postgres", "CREATE DATABASE citycard");
        pair.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &pair.primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                path(&pair.standby.dir),
                "-R",
                "-X",
                "stream",
            ],
        );
        pair.append(
            &pair.standby.dir.join("postgresql.conf"),
            &format!("\nport = {}\n", pair.standby.port),
        );
        // pg_basebackup -R wrote a primary_conninfo into postgresql.auto.conf, which is read last:
        // the standby's name for synchronous_standby_names goes there.
        pair.append(
            &pair.standby.dir.join("postgresql.auto.conf"),
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name=dr'\n",
                pair.primary.port
            ),
        );
        pair.start_server(&pair.standby);
        // Only now synchronous: until the standby streams, a commit would wait for it forever
        // (CREATE DATABASE above included).
        pair.psql(
            pair.primary.port,
            "postgres",
            "ALTER SYSTEM SET synchronous_standby_names = 'dr'",
        );
        pair.psql(pair.primary.port, "postgres", "SELECT pg_reload_conf()");
        pair.wait_sync();
        pair
    }

    /// A command as the PostgreSQL user (as root) or as ourselves.
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        // No statement waits forever (a synchronous commit without a standby would).
        let out = self
            .command(program)
            .args(args)
            .env("PGOPTIONS", "-c statement_timeout=60000")
            .current_dir(self.base.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn append(&self, file: &Path, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(file).unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    pub fn start_server(&self, pg: &Pg) {
        self.run("pg_ctl", &["-D", path(&pg.dir), "-l", path(&pg.log), "-w", "-t", "60", "start"]);
    }

    /// Stops a server: `immediate` is a crash (no shutdown checkpoint), `fast` a clean stop.
    pub fn stop_server(&self, pg: &Pg, mode: &str) {
        let _ = self
            .command("pg_ctl")
            .args(["-D", path(&pg.dir), "-m", mode, "-w", "-t", "60", "stop"])
            .output();
    }

    /// `pg_ctl promote` of the standby, then lets it commit without a synchronous standby (it
    /// has none until one is built for it: the runbook's decision, written down there).
    pub fn promote_standby(&self) {
        self.run("pg_ctl", &["-D", path(&self.standby.dir), "-w", "-t", "60", "promote"]);
        self.psql(self.standby.port, "postgres", "ALTER SYSTEM SET synchronous_standby_names = ''");
        self.psql(self.standby.port, "postgres", "SELECT pg_reload_conf()");
    }

    /// Makes `target` a streaming synchronous standby of `source` (fail-back: the old primary's
    /// server rebuilt from the promoted one with pg_basebackup, as in the README runbook), and
    /// waits until `source` reports it synchronous.
    pub fn rebuild_standby_of(&self, target: &Pg, source: &Pg) {
        self.stop_server(target, "immediate");
        std::fs::remove_dir_all(&target.dir).unwrap();
        self.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &source.port.to_string(),
                "-U",
                "postgres",
                "-D",
                path(&target.dir),
                "-R",
                "-X",
                "stream",
            ],
        );
        self.append(&target.dir.join("postgresql.conf"), &format!("\nport = {}\n", target.port));
        self.append(
            &target.dir.join("postgresql.auto.conf"),
            &format!(
                "synchronous_standby_names = ''\nprimary_conninfo = 'host=127.0.0.1 port={} \
                 user=postgres application_name=dr'\n",
                source.port
            ),
        );
        self.start_server(target);
        self.psql(source.port, "postgres", "ALTER SYSTEM SET synchronous_standby_names = 'dr'");
        self.psql(source.port, "postgres", "SELECT pg_reload_conf()");
        self.wait_sync_on(source);
    }

    /// `pg_ctl promote` of any server of the pair, then commits without a synchronous standby
    /// (see [`PgPair::promote_standby`]).
    pub fn promote(&self, pg: &Pg) {
        self.run("pg_ctl", &["-D", path(&pg.dir), "-w", "-t", "60", "promote"]);
        self.psql(pg.port, "postgres", "ALTER SYSTEM SET synchronous_standby_names = ''");
        self.psql(pg.port, "postgres", "SELECT pg_reload_conf()");
    }

    pub fn psql(&self, port: u16, db: &str, sql: &str) -> String {
        let out = self.run(
            "psql",
            &[
                "-X",
                "-q",
                "-t",
                "-A",
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits until the primary reports the standby as its synchronous one.
    fn wait_sync(&self) {
        self.wait_sync_on(&self.primary)
    }

    fn wait_sync_on(&self, primary: &Pg) {
        let started = Instant::now();
        loop {
            let state = self.psql(
                primary.port,
                "postgres",
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = 'dr'",
            );
            if state == "sync" {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "standby never became sync: {}{}",
                std::fs::read_to_string(&self.standby.log).unwrap_or_default(),
                std::fs::read_to_string(&self.primary.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn conninfo(&self, pg: &Pg) -> String {
        format!("host=127.0.0.1 port={} user=postgres dbname=citycard", pg.port)
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

impl Drop for PgPair {
    /// A test that fails must not leave PostgreSQL servers running.
    fn drop(&mut self) {
        self.stop_server(&self.standby, "immediate");
        self.stop_server(&self.primary, "immediate");
    }
}
