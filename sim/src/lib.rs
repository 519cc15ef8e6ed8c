//! A deterministic simulator of the citycard engine: one seed drives terminals of every role,
//! the clock, crashes and storage faults against the real [`citycard::engine::Shard`] on the
//! in-memory disk, single-threaded, and every step is checked against a reference ledger.
//!
//! # Layout
//!
//! - `rng`: the seeded PRNG every choice comes from.
//! - `model`: the reference ledger (cards, ATC uses, staff operations, money in and out).
//! - `effect`: what an acknowledged answer changes in the ledger, as data.
//! - `traffic`: the terminals: requests built with real card keys and cryptograms, each answer
//!   checked when it arrives.
//! - `transit`: the 1.2 terminals (tap-in/out, Funds, reversals, inquiries), checked against
//!   the ledger's holds, purchases and burnt ATCs.
//! - `remote`: the simulated PostgreSQL (records by shard and seq, the COMMIT statement's rules).
//! - `replication`: the replication step: the server's `replicate::flow` driven against the
//!   remote with seeded faults, answers acknowledged only when it releases them, failovers.
//! - `world`: the shards, the disk, commits, faults, crashes, restarts and the invariants.
//!
//! The same seed gives the same trace ([`Summary::trace`], a SHA-256 over every request,
//! answer and event); a failing seed says the command that replays it.

pub mod effect;
pub mod model;
pub mod remote;
pub mod replication;
pub mod rng;
pub mod traffic;
pub mod transit;
pub mod world;

use std::fmt;

pub use citycard::sim_bugs::Bug;

/// One run.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    pub seed: u64,
    pub steps: u64,
    /// A bug compiled into the engine with the `bugs` feature, switched on for this run.
    pub inject: Option<Bug>,
}

/// What a clean run did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub seed: u64,
    pub steps: u64,
    /// Requests and offline records executed by the shards.
    pub transactions: u64,
    pub crashes: u64,
    pub faults: u64,
    /// Answers the replication flow released (acknowledged) and refused Unavailable, steps
    /// whose card work was refused, replication faults injected, failover drills.
    pub released: u64,
    pub refused: u64,
    pub refused_steps: u64,
    pub replication_faults: u64,
    pub failovers: u64,
    pub failover_checked: u64,
    /// SHA-256 of the trace, hex.
    pub trace: String,
}

/// A broken invariant (or a run that could not be set up).
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    /// The step at which it was found (1-based).
    pub step: u64,
    pub inject: Option<Bug>,
    pub message: String,
}

impl Failure {
    fn setup(config: &Config, e: std::io::Error) -> Failure {
        Failure {
            seed: config.seed,
            step: 0,
            inject: config.inject,
            message: format!("setup: {e}"),
        }
    }

    /// The one command that replays this failure.
    pub fn command(&self) -> String {
        match self.inject {
            None => format!(
                "cargo run -p citycard-sim --release -- --seed {} --steps {}",
                self.seed, self.step
            ),
            Some(bug) => format!(
                "cargo run -p citycard-sim --release --features bugs -- --seed {} --steps {} \
                 --inject {}",
                self.seed,
                self.step,
                bug.name()
            ),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} failed at step {}: {}\n  reproduce: {}",
            self.seed,
            self.step,
            self.message,
            self.command()
        )
    }
}

/// Runs one seed for `config.steps` steps, then stops the shards and audits the data with
/// `citycard verify`'s library function.
pub fn run(config: Config) -> Result<Summary, Failure> {
    citycard::sim_bugs::set(config.inject);
    let result = run_inner(config);
    citycard::sim_bugs::set(None);
    result
}

fn run_inner(config: Config) -> Result<Summary, Failure> {
    let mut world = world::World::new(config)?;
    for _ in 0..config.steps {
        world.run_step()?;
    }
    world.finish()?;
    let digest = world.trace.clone().finish();
    let trace = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    Ok(Summary {
        seed: config.seed,
        steps: config.steps,
        transactions: world.transactions,
        crashes: world.crashes,
        faults: world.faults,
        released: world.repl.released,
        refused: world.repl.refused,
        refused_steps: world.repl.refused_steps,
        replication_faults: world.repl.replication_faults,
        failovers: world.repl.failovers,
        failover_checked: world.repl.failover_checked,
        trace,
    })
}
