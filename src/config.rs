//! Server configuration: every limit with its default and the reason for it.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::engine::Limits;

/// Everything `citycard serve` can be told. Defaults are in [`Config::default`].
#[derive(Clone, Debug)]
pub struct Config {
    pub listen: SocketAddr,
    pub keys_dir: PathBuf,
    pub data_dir: PathBuf,
    /// Shards (worker threads, journals); None = number of cores. Fixed per data directory.
    pub shards: Option<u16>,
    /// Pin each shard thread to a core.
    pub pin_cores: bool,
    /// Optional CRL of revoked terminal certificates (PEM).
    pub crl: Option<PathBuf>,
    /// Most concurrent terminal connections: each costs a task, TLS state and buffers (~100 KiB
    /// worst case), so 4,096 bounds memory to well under 1 GiB.
    pub max_connections: usize,
    /// Requests in flight per connection; beyond it the server stops reading that socket
    /// (back-pressure). 64 covers a pipelining reader without letting one terminal fill a queue.
    pub max_in_flight: usize,
    /// TLS handshake must finish within this, or the connection is dropped.
    pub handshake_timeout_ms: u64,
    /// A connection with nothing in flight and no bytes for this long is closed.
    pub idle_timeout_ms: u64,
    /// A frame whose first byte arrived must be complete within this (slow-loris bound).
    pub frame_timeout_ms: u64,
    /// A reply that cannot be written within this closes the connection (stuck reader).
    pub write_timeout_ms: u64,
    /// Jobs queued per shard; a full queue answers Busy. 8,192 is ~8 batches of work.
    pub queue_depth: usize,
    /// Most jobs one group commit covers: bounds latency added to the first job of a batch.
    pub max_batch: usize,
    /// On SIGTERM, how long to wait for in-flight requests before closing connections.
    pub drain_timeout_ms: u64,
    pub limits: Limits,
    /// Key versions and the Unix ms after which cards on them are declined.
    pub key_cutoffs: Vec<(u16, u64)>,
    /// Journal segment size in bytes (preallocated).
    pub segment_bytes: u64,
    /// Test seam: injected journal write/sync failures (shared by every shard). None in
    /// production.
    pub journal_faults: Option<std::sync::Arc<crate::journal::FaultInjector>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            keys_dir: PathBuf::from("keys"),
            data_dir: PathBuf::from("data"),
            shards: None,
            pin_cores: false,
            crl: None,
            max_connections: 4096,
            max_in_flight: 64,
            handshake_timeout_ms: 5_000,
            idle_timeout_ms: 300_000,
            frame_timeout_ms: 10_000,
            write_timeout_ms: 10_000,
            queue_depth: 8192,
            max_batch: 1024,
            drain_timeout_ms: 10_000,
            limits: Limits::default(),
            key_cutoffs: Vec::new(),
            segment_bytes: 64 * 1024 * 1024,
            journal_faults: None,
        }
    }
}

impl Config {
    /// Rejects values that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_in_flight", self.max_in_flight as u64),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("frame_timeout_ms", self.frame_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
            ("queue_depth", self.queue_depth as u64),
            ("max_batch", self.max_batch as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("{key} must be greater than 0"));
            }
        }
        if self.max_in_flight > usize::from(u16::MAX) {
            return Err("max_in_flight must be at most 65535".into());
        }
        if let Some(n) = self.shards {
            if n == 0 || usize::from(n) > citycard_protocol::MAX_SHARDS {
                return Err(format!("shards must be 1..={}", citycard_protocol::MAX_SHARDS));
            }
        }
        if self.limits.max_balance <= 0 || self.limits.max_amount <= 0 {
            return Err("max_balance and max_amount must be positive".into());
        }
        if self.segment_bytes < 64 * 1024 {
            return Err("segment_bytes must be at least 65536".into());
        }
        Ok(())
    }
}
