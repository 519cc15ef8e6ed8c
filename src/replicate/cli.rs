//! The `citycard standby` and `citycard promote` commands: arguments, runtime, and output.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::promote::{promote, PromoteOptions};
use super::standby::{StandbyOptions, DEFAULT_POLL_MS};
use super::standby_state::{StateBuild, DEFAULT_STATE_EVERY_RECORDS};

#[derive(clap::Args)]
pub struct StandbyArgs {
    /// Connection string of the DR site's PostgreSQL (a hot standby is fine: only reads).
    #[arg(long, env = "CITYCARD_STANDBY_SOURCE")]
    pub source: String,
    /// PEM of the CA that signed PostgreSQL's certificate (required off loopback).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The standby's own data directory.
    #[arg(long, env = "CITYCARD_DATA")]
    pub data: PathBuf,
    /// How often to look for new records once caught up.
    #[arg(long, default_value_t = DEFAULT_POLL_MS)]
    pub poll_ms: u64,
    /// Loopback address for `/metrics` (lag per shard) and `/readyz`.
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    /// Journal segment size of new segments (the primary's, normally).
    #[arg(long, default_value_t = crate::journal::DEFAULT_SEGMENT_BYTES)]
    pub segment_bytes: u64,
    /// The key set the promoted site will serve with: the standby then keeps the derived
    /// state (sled, checkpoint) up while it follows, so a promotion replays only the records
    /// since the last build. Without it the standby writes only the journal.
    #[arg(long, env = "CITYCARD_KEYS")]
    pub keys: Option<PathBuf>,
    /// With --keys: records followed (all shards) between two builds of the derived state.
    #[arg(long, default_value_t = DEFAULT_STATE_EVERY_RECORDS)]
    pub state_every_records: u64,
}

#[derive(clap::Args)]
pub struct PromoteArgs {
    /// Connection string of the DR site's PostgreSQL, already promoted (writable).
    #[arg(long, env = "CITYCARD_STANDBY_SOURCE")]
    pub source: String,
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The standby's data directory (the standby must be stopped).
    #[arg(long, env = "CITYCARD_DATA")]
    pub data: PathBuf,
    #[arg(long, default_value_t = crate::journal::DEFAULT_SEGMENT_BYTES)]
    pub segment_bytes: u64,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?)
}

/// Runs the standby until SIGTERM or SIGINT.
pub fn standby(args: StandbyArgs) -> anyhow::Result<ExitCode> {
    let options = StandbyOptions {
        source: args.source,
        ca: args.ca,
        data_dir: args.data,
        poll_ms: args.poll_ms,
        admin: args.admin,
        segment_bytes: args.segment_bytes,
        state: match &args.keys {
            Some(keys) => {
                Some(StateBuild::load(keys, args.state_every_records, args.segment_bytes)?)
            }
            None => {
                tracing::info!("no --keys: the standby keeps only the journal; a promoted directory builds its state from the whole journal at its first start");
                None
            }
        },
    };
    runtime()?.block_on(async move {
        let stop = CancellationToken::new();
        let signal = stop.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(term) => term,
                    Err(_) => return,
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("standby stopping");
            signal.cancel();
        });
        super::standby::run(options, stop).await
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn promote_command(args: PromoteArgs) -> anyhow::Result<ExitCode> {
    let options = PromoteOptions {
        source: args.source,
        ca: args.ca,
        data_dir: args.data,
        segment_bytes: args.segment_bytes,
    };
    let promoted = runtime()?.block_on(promote(&options))?;
    println!("promoted: generation {}", promoted.generation);
    for (shard, seq, hash) in &promoted.heads {
        println!("shard {shard}: last seq {seq} head {}", crate::hex::encode(hash));
    }
    println!(
        "now serve this data directory with [replicate] conninfo pointing at this PostgreSQL \
         (see the README runbook)"
    );
    Ok(ExitCode::SUCCESS)
}
