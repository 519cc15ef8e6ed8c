//! `citycard-sim`: runs seeds of the deterministic simulator and reports seeds and simulated
//! transactions per second; a failing seed prints the command that replays it.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// Prints a line; a closed stdout (`| head`) ends the output, not the process with a panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

#[derive(Parser, Debug)]
#[command(name = "citycard-sim", about = "Deterministic simulator of the citycard engine")]
struct Args {
    /// First seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How many seeds to run, from --seed up.
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// Steps per seed (each a batch of 1-8 terminal commands and its commits).
    #[arg(long, default_value_t = 2_000)]
    steps: u64,
    /// Switch on one injected bug (needs `--features bugs`): ack-before-sync, atc-off-by-one,
    /// forget-overlay, applied-seq-before-data, torn-tail-kept, replay-skips-one,
    /// release-early.
    #[arg(long)]
    inject: Option<String>,
    /// With --inject: keep going after a seed finds the bug (how many seeds find it).
    #[arg(long)]
    all: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let inject = match args.inject.as_deref().map(citycard_sim::Bug::parse) {
        None => None,
        Some(Ok(bug)) => Some(bug),
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let (mut transactions, mut ran, mut failed) = (0u64, 0u64, 0u64);
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        ran += 1;
        match citycard_sim::run(citycard_sim::Config { seed, steps: args.steps, inject }) {
            Ok(summary) => {
                transactions += summary.transactions;
                say!(
                    "seed {seed}: ok, {} steps, {} transactions, {} crashes, {} faults; \
                     replication: {} answers released, {} refused, {} steps refused, {} faults, \
                     {} failovers ({} answers asked again); trace {}",
                    summary.steps,
                    summary.transactions,
                    summary.crashes,
                    summary.faults,
                    summary.released,
                    summary.refused,
                    summary.refused_steps,
                    summary.replication_faults,
                    summary.failovers,
                    summary.failover_checked,
                    &summary.trace[..16]
                );
            }
            Err(failure) => {
                failed += 1;
                say!("{failure}");
                if !args.all {
                    break;
                }
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    say!(
        "{ran} seeds run, {failed} failed, {transactions} transactions in {secs:.1} s ({:.0} \
         simulated transactions/s)",
        transactions as f64 / secs.max(1e-9)
    );
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
