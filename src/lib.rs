//! citycard: the transaction server behind a city's citizen card.
//!
//! # Layout
//! - [`config`]: every setting and limit, with defaults and reasons.
//! - [`keys`]: development PKI, terminal certificates, issuer and assertion keys.
//! - [`identity`]: roles and terminal ids (certificate OU and CN).
//! - [`layout`]: the data directory: lock, shard count, shard and archive directories.
//! - [`hex`]: lowercase hex, once; [`int_hash`]: a fast unkeyed hasher for server-chosen or
//!   bounded integer keys.
//! - [`host`]: the system clock and real pauses, passed to the engine by its edges.
//! - [`tls`]: rustls server/client configuration and terminal identity from certificates.
//! - [`journal`]: the per-shard append-only journal (source of truth, group commit).
//! - [`engine`]: the shard engine: decisions, journal records, derived state in sled.
//! - [`server`]: TLS listener, connection tasks, shard worker threads, shutdown; `server::trust`
//!   holds the TLS configs and open connections a SIGHUP CRL reload works on; each connection is
//!   a sans-IO `server::session` (frames, timers, closing order, `now` passed in) under the
//!   tokio driver `server::connection`.
//! - [`verify`]: the offline audit of a data directory; [`report`]: settlement reports;
//!   [`archive`]: pruning the archive behind a signed anchor.
//! - [`counter`]: the staff counter console (web page on loopback and CLI) over `citycard-client`.
//! - [`metrics`]: lock-free counters and histograms; [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`sim_bugs`]: bugs the simulator switches on to prove it finds them (feature `sim-bugs`).
//! - [`replicate`]: disaster recovery: group commits also committed to PostgreSQL, the standby
//!   that follows them, promotion and the generation fence.
#![forbid(unsafe_code)]

pub mod admin;
pub mod archive;
pub mod config;
pub mod counter;
pub mod engine;
pub mod hex;
pub mod host;
pub mod identity;
pub mod int_hash;
pub mod journal;
pub mod keys;
pub mod layout;
pub mod metrics;
pub mod replicate;
pub mod report;
pub mod server;
pub mod sim_bugs;
pub mod tls;
pub mod verify;

use std::io::Write;
use std::path::Path;

/// Wall-clock time in Unix milliseconds. Only the edges (worker loop, connection) call this;
/// the engine takes time as an argument.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Writes a small file so that it is either absent or complete after a crash: temp file,
/// fsync, rename, fsync of the directory.
pub fn durable_write(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
