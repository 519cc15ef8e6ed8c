//! `citycard-loadtest`: simulated terminals and cards speaking the real citycard protocol over
//! mutual TLS, with HDR latency reports, and a floor server that shows what the transport alone
//! costs. The binary parses the command line and calls [`run::main`].
//!
//! # Layout
//!
//! From the top down; a module uses only modules below it.
//!
//! - [`run`]: one run from start to end: which server, terminals and cards, the workers started
//!   together, CPU over the measured window, the report and files.
//! - [`options`]: the command line (clap): every option, its default and its help.
//! - [`server`]: `--spawn`: a fresh `citycard serve` with fresh keys on 127.0.0.1.
//! - [`floor`]: `--floor`: an in-process echo server with the real transport that decides
//!   nothing, the floor citycard's figures are read against.
//! - [`workload`]: the workers: the load loop (closed or open), each answer checked against its
//!   request, the final balance check.
//! - [`cards`]: the simulated cards (key, ATC, the tester's reckoning) and their issue.
//! - [`client`]: the terminals: their discovery in a keys directory and their
//!   `citycard-client` configuration (the connections are `citycard_client::Client`s).
//! - [`report`]: the text and JSON summaries and the `.hgrm` percentile distribution.
//! - [`verdict`]: how one answer turned out: the client's checked answer or error, sorted into
//!   what is known of the card afterwards.
//! - [`stats`]: what a worker counts: the latency histogram and the tally of answers.
//! - [`mix`]: the card operations, their weights, and the seeded random choices.
//! - [`plot`]: the latency chart as a PNG.
//! - [`cpu`]: CPU time of a process or of named threads, from `/proc`.

pub mod cards;
pub mod client;
pub mod cpu;
pub mod floor;
pub mod mix;
pub mod options;
pub mod plot;
pub mod report;
pub mod run;
pub mod server;
pub mod stats;
pub mod verdict;
pub mod workload;
