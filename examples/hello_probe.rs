//! Waits until a citycard server answers a Hello over mutual TLS and prints the Unix time in
//! nanoseconds at which the answer arrived (used by `scripts/storage_figures.sh` to time a
//! restart: process start to the first Hello answered).
//!
//! ```text
//! cargo run --release --example hello_probe -- --server 127.0.0.1:7700 --keys keys --timeout-s 120
//! ```
//!
//! Every attempt is a fresh TCP connect + TLS 1.3 handshake + Hello with one try and a short
//! timeout; refused connections are retried every millisecond until `--timeout-s`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use citycard_client::{Client, Config, RetryPolicy};
use clap::Parser;

/// Longest wait the probe accepts (a start slower than this is a failure in itself).
const MAX_TIMEOUT_S: u64 = 3_600;
/// Pause between two refused attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(1);

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:7700")]
    server: String,
    #[arg(long)]
    keys: PathBuf,
    #[arg(long, default_value = "reader-1")]
    terminal: String,
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
}

fn unix_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.timeout_s == 0 || args.timeout_s > MAX_TIMEOUT_S {
        bail!("--timeout-s must be 1..={MAX_TIMEOUT_S}");
    }
    let mut config = Config::from_keys_dir(args.server.clone(), &args.keys, &args.terminal)?;
    config.retry = RetryPolicy { attempts: 1, ..RetryPolicy::default() };
    config.connect_timeout_ms = 1_000;
    // A start that is still opening its shards may accept and hold the connection: wait long.
    config.request_timeout_ms = args.timeout_s * 1_000;
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut attempts = 0u64;
    loop {
        attempts += 1;
        let client = Client::new(config.clone())?;
        match client.hello(0).await {
            Ok(info) => {
                let at = unix_ns();
                println!("{at} attempts={attempts} shards={}", info.shard_count);
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                tracing_log(&e, attempts);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => bail!("no Hello answered within {} s: {e}", args.timeout_s),
        }
    }
}

fn tracing_log(e: &citycard_client::ClientError, attempts: u64) {
    if attempts == 1 {
        eprintln!("hello_probe: not yet ({e}); retrying");
    }
}
