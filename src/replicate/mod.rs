//! Disaster recovery on PostgreSQL synchronous streaming replication: every shard's group
//! commit is also one PostgreSQL transaction, and an answer waits for both.
//!
//! # Layout
//! - [`cli`]: the `standby` and `promote` commands.
//! - [`config`]: the `[replicate]` section (connection string, TLS, stall bound, mode).
//! - [`connect`]: opening a PostgreSQL connection (TLS with ring unless on loopback).
//! - [`schema`]: the tables, the statements, and the generation fence.
//! - [`site`]: what a data directory records about its place in the pair (role, generation).
//! - [`flow`]: the replication task's decisions, a synchronous state machine with time passed
//!   in (shared by the server and the simulator).
//! - [`link`]: the shard worker's side: refusing while stalled, handing over replies.
//! - [`refusal`]: the Unavailable answers given instead of an unreplicated one.
//! - [`primary`]: the per-shard task that ships committed records and releases replies.
//! - [`standby`]: `citycard standby`, following the batches into a journal of its own.
//! - [`standby_state`]: the standby's derived state, kept up while it follows.
//! - [`promote`]: `citycard promote`, fencing the old primary by a new generation.
//!
//! # Guarantees
//! In `sync` mode no answer leaves the server before its batch is durable in the local journal
//! and committed in PostgreSQL (whose `synchronous_standby_names` makes a commit wait for the
//! standby's flush). Batches of one shard are committed in journal order on one connection; each
//! statement advances the shard's head row only from the seq it expects, so PostgreSQL never holds
//! a gap, and only under the generation it expects, so a promoted site fences the old primary.
//! A batch is shipped only after its local `fdatasync` returned, so PostgreSQL never holds a
//! record a power loss could take from the local journal. (Shipping while the sync ran was tried
//! and gained nothing measurable; a record PostgreSQL held beyond the local journal would make
//! the primary refuse to go on, `Diverged`.)

pub mod cli;
pub mod config;
pub mod connect;
pub mod flow;
pub mod link;
pub mod primary;
pub mod promote;
pub mod refusal;
pub mod schema;
pub mod site;
pub mod standby;
pub mod standby_state;

pub use config::{Mode, ReplicateConfig, ReplicateSettings};
pub use link::{Replication, ShardLink};

/// Errors of replication. Connection and statement failures are retried; `Fenced` and
/// `Diverged` stop the primary.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicateError {
    #[error("postgresql: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("replication configuration: {0}")]
    Config(String),
    #[error("connecting to postgresql timed out after {0} ms")]
    ConnectTimeout(u64),
    #[error("tls for postgresql: {0}")]
    Tls(String),
    /// A newer generation was recorded in PostgreSQL: another site was promoted.
    #[error(
        "fenced: PostgreSQL records generation {found} for shard {shard}, this data directory \
         generation {ours}; another site was promoted, so this one may neither commit nor answer \
         (make it a standby of the new primary to fail back)"
    )]
    Fenced { shard: u16, ours: u64, found: u64 },
    /// The local journal and PostgreSQL disagree about the same records.
    #[error("shard {shard}: the journal and PostgreSQL disagree: {reason}")]
    Diverged { shard: u16, reason: String },
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("{0}")]
    Site(String),
}
